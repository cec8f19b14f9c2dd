//! AMD ROCm backend (placeholder until the HIP implementation lands).
