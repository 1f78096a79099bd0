"""Device drivers built on the HMM core: ``dmirror`` (the kernel's lib/test_hmm.c)."""
