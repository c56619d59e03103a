"""Classification-specific evaluation: metrics, calibration and plots."""
