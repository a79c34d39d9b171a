"""lorasched.calibration: running denoising passes with a selection rule installed online, and recording it."""
