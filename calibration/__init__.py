"""lorasched.calibration: running denoising passes with a selection rule installed online, recording its decisions,
and turning them into a schedule (and EST's probe β)."""
