//! The directive table (stub; filled in below).

pub fn is_known_directive(name: &str) -> bool {
    matches!(name, "listen" | "server" | "location")
}
