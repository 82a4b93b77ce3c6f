"""Host-side tools: QEMU launch, console, QMP, CLI and the pytest plugin."""
