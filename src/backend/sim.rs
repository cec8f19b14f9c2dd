//! Simulated GPU (placeholder).
