"""Loading causal LMs from local files, shared by the chat service and the trainer."""
