"""vsfs: host storage (libvirt's pools and volumes) as a FUSE filesystem."""

__version__ = "0.1.0"
