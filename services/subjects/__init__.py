"""Subject service: upload a subject's photos once (validated, EXIF-oriented) and refer to them by id."""
