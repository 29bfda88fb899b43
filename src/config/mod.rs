//! Text → validated config. Imports no tokio, hyper or tower.
//!
//! `parse` turns bytes into the syntax tree (with `include` expanded),
//! `schema` says what every directive means, `validate` turns the tree into
//! the typed [`model`] and a list of [`diagnostics::Diagnostic`]s, and
//! `format` prints a tree back canonically for `tollgate fmt`.

pub mod ast;
pub mod diagnostics;
pub mod format;
pub mod model;
pub mod parse;
pub mod schema;
pub mod source;
pub mod validate;
pub mod value;
