"""What a model is and how it is kept: base models, trained concepts, their exports and the fusing of each method's
weights into a pipeline. train, generate, evaluate and mask import it; it imports only runtime."""
