"""The notebook's folder on the host and back: which files go (rules.py), how they are
packed and written without following a link (archive.py), and how they cross the relay
(transfer.py). The user side (kernel/files.py) and the host (host/files.py) are shells
around these."""
