//! `tollgate fmt`: canonical layout (being written on the `fmt` branch).
use crate::config::diagnostics::Diagnostics;

/// Placeholder until the formatter lands: returns the text unchanged.
pub fn format_source(text: &str) -> Result<String, Diagnostics> {
    Ok(text.to_string())
}
