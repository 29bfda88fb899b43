//! Load balancing (LANGUAGE.md §5).
