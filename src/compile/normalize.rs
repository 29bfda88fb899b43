//! Path normalization (LANGUAGE.md §3).
