"""vdev: a vhost-user virtio-net device for driver testing, built on Skywalk-style rings."""

__version__ = "0.1.0"
