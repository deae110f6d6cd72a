"""EMILI gateway: browser participants and HTTP clients reach EMILI studies through the chat gRPC API."""
