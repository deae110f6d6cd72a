"""EMILI FER service: face frames in, seven-emotion readings out."""
