//! How values from the config are shown where they could carry a secret:
//! URLs in `check`'s summary and the logs (query strings and user
//! information replaced), values quoted back in errors (long ones
//! elided), and the parser's own messages (their quoted values so
//! elided).

/// A URL as `check` shows it: its query string replaced by `?…`
/// (Firebase refresh URLs carry an API key there) and its user
/// information by `…@` (a password sent as Basic authentication).
pub(crate) fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, _)) => (base, "?…"),
        None => (url, ""),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("", base));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://…@{}{query}", &rest[at + 1..]),
        None => format!("{base}{query}"),
    }
}

/// How a value from the file is shown in an error: quoted when it is
/// short, `"…"` when it could be a secret typed into the wrong field (16
/// characters or more: keys and refresh tokens are longer than any
/// setting).
pub(crate) fn shown(value: &str) -> String {
    if value.chars().count() < 16 && !value.chars().any(char::is_control) {
        format!("\"{value}\"")
    } else {
        "\"…\"".to_string()
    }
}

/// A parser message whose quoted string values are shown by [`shown`].
///
/// serde quotes the offending value (`invalid type: string "…", expected
/// u32`, `unknown variant `…`, expected …`); when a secret was typed into
/// the wrong field that would put it in a log line and the `/admin/reload`
/// answer. Field names and the expected variants stay.
pub(crate) fn redact_quoted(message: &str) -> String {
    let mut message = message.to_string();
    for (mark, close) in [("string \"", '"'), ("unknown variant `", '`')] {
        let mut out = String::with_capacity(message.len());
        let mut rest = message.as_str();
        while let Some(at) = rest.find(mark) {
            let value_start = at + mark.len();
            let Some(len) = rest[value_start..].find(close) else {
                break;
            };
            out.push_str(&rest[..value_start - 1]);
            let value = &rest[value_start..value_start + len];
            match close {
                '"' => out.push_str(&shown(value)),
                _ => out.push_str(&format!("`{}`", shown(value).trim_matches('"'))),
            }
            rest = &rest[value_start + len + 1..];
        }
        out.push_str(rest);
        message = out;
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_keys_or_passwords() {
        assert_eq!(
            redact_url("https://u:pw@h.example:8443/p?key=k"),
            "https://…@h.example:8443/p?…"
        );
        assert_eq!(redact_url("https://h.example/a@b"), "https://h.example/a@b");
        assert_eq!(redact_url("https://h.example/p"), "https://h.example/p");
    }
}
