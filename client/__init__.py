"""persona's client side: a typed SDK over the generated stubs, and the persona-cli Typer app."""
