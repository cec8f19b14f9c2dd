//! NVIDIA CUDA backend (placeholder until the cudarc implementation lands).
