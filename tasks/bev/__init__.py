"""BEV detection distillation (UniDistill): LiDAR ↔ camera bird's-eye-view detectors and nuScenes-style metrics."""
