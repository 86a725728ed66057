"""The proxy image (AMI): bake, list, delete. See images.py; the command line is __main__.py."""
