"""Storage shared by training and serving: user paths on local disks and object stores."""
