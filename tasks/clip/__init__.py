"""CLIP compression: teacher → student distillation with inheritance, progressive stages, evaluation, demo."""
