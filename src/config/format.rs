//! `tollgate fmt`: canonical layout.
