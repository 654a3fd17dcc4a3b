"""`agestream train`: the project's own GenderAge model, from pipeline chips to ONNX."""
