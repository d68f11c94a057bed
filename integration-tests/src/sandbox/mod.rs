//! The sandbox GitLab (placeholder).
