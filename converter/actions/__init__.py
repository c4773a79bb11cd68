"""What each command does (convert, quantize, repair, publish, the way back, GGUF), free of click."""
