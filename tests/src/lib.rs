//! QEMU harness for sanblk end-to-end tests.
