"""Model definitions; Llama 3 is the one family titan_cp trains."""
