"""lorasched.merge: LoRA files -> canonical pair -> decisions -> schedule -> exported file -> replay."""
