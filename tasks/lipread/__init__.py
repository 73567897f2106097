"""Lip reading: shared recogniser blocks, CTC/attention decoding, CER/WER metrics, evaluation and its command."""
