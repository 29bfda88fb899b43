//! The compiled router (LANGUAGE.md §3).
