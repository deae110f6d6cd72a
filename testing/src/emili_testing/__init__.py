"""Test support shared by EMILI's test folders: real Redis and S3 fixtures, tokens, test doubles."""
