"""tgo's geometry inside other training frameworks (each an optional extra):
`tgo.integrations.lightning.GeometryCallback` for PyTorch Lightning (`pip install tgo[lightning]`)."""
