"""The torch reference path: the model and its linears, on any device torch runs on."""
