//! What a QEMU VM description may contain: which options, which
//! properties of each and which values, which kinds of devices, objects and
//! backends. The source reads a QEMU command line through these lists
//! ([`super::describe`]); a destination checks every value of a description
//! it received against them again ([`super::description`]). Anything not
//! listed is refused by name. The lists themselves are in [`list`]; here
//! are QEMU's value syntaxes and the checks.

mod list;

pub(in crate::vm::qemu) use list::{
    Opt, Schema, ACCEL, CHARDEVS, DEVICES, DISK_PROPS, GLOBAL_DRIVERS, MACHINE, MEM, MEMORY_BACKEND, NETDEVS,
    NIC_PROPS, NUMA, OBJECTS, OPTIONS, PLAIN_OPTIONS, RAM_PROPS, SMP, V,
};
use list::{BOOLS, MAX_TEXT};
use serde_json::{Map, Value};

/// Whether `v` satisfies `rule` (a file never does: descriptions name none).
pub(in crate::vm::qemu) fn value_ok(rule: &V, v: &str) -> bool {
    match rule {
        V::Id => is_id(v),
        V::Num => !v.is_empty() && v.len() <= 20 && v.bytes().all(|b| b.is_ascii_digit()),
        V::Size => parse_qemu_size(v).is_some(),
        V::Bool => BOOLS.contains(&v),
        V::Word => is_word(v),
        V::Text => v.len() <= MAX_TEXT && !v.chars().any(char::is_control),
        V::OneOf(list) => list.contains(&v),
        V::File => false,
    }
}

/// What `rule` allows, for error messages.
pub(in crate::vm::qemu) fn rule_text(rule: &V) -> &'static str {
    match rule {
        V::Id => "an id: a letter, then letters, digits, '-', '_', '.'",
        V::Num => "a number",
        V::Size => "a size",
        V::Bool => "on or off",
        V::Word => "letters, digits and _ . : + - @",
        V::Text => "printable text",
        V::OneOf(_) => "not one of the allowed values",
        V::File => "a file beneath storage",
    }
}

/// `-cpu model,+flag,-flag,key=value`: every part a word.
pub(in crate::vm::qemu) fn check_cpu(value: &str) -> Result<(), &'static str> {
    for part in split_keyval(value) {
        let flag = part.strip_prefix(['+', '-']).unwrap_or(&part);
        let (k, v) = flag.split_once('=').unwrap_or((flag, flag));
        if !is_word(k) || !is_word(v) {
            return Err("CPU models, flags and properties are words");
        }
    }
    Ok(())
}

/// A device property: a plain name and printable value; `romfile` (a host
/// file loaded into the guest) only empty.
pub(in crate::vm::qemu) fn check_device_prop(k: &str, v: &str) -> Result<(), &'static str> {
    if !is_prop_name(k) {
        return Err("a property name: letters, digits, '-', '_', '.'");
    }
    if !value_ok(&V::Text, v) {
        return Err(rule_text(&V::Text));
    }
    if k == "romfile" && !v.is_empty() {
        return Err("only romfile= (none)");
    }
    Ok(())
}

/// The schema of an object kind a description carries as it is (RAM
/// backends are the destination's own).
pub(in crate::vm::qemu) fn plain_object(kind: &str) -> Option<&'static Schema> {
    OBJECTS.iter().find(|(k, _)| *k == kind && !k.starts_with("memory-backend")).map(|(_, s)| s)
}

/// An option of [`PLAIN_OPTIONS`] with its value (none for a flag).
pub(in crate::vm::qemu) fn check_plain_option(name: &str, value: Option<&str>) -> Result<(), &'static str> {
    plain_option(name, value).map(drop)
}

/// An option of [`PLAIN_OPTIONS`], checked, and its value as QEMU gets
/// it: rebuilt from the checked properties (`key=value`, commas doubled),
/// never the text as given, which QEMU could read otherwise (JSON is
/// refused: not every option takes it, and one that does not would split
/// a JSON string at its commas).
pub(in crate::vm::qemu) fn plain_option(name: &str, value: Option<&str>) -> Result<Option<String>, &'static str> {
    let Some((_, opt)) = PLAIN_OPTIONS.iter().find(|(n, _)| *n == name) else {
        return Err("an option with no host resource in it");
    };
    match (opt, value) {
        (Opt::Flag, None) => Ok(None),
        (Opt::Value(rule), Some(v)) if value_ok(rule, v) && !v.contains(',') => Ok(Some(v.to_owned())),
        (Opt::Keyval(_), Some(v)) if v.trim_start().starts_with('{') => Err("key=value, not JSON"),
        (Opt::Keyval(schema), Some(v)) => {
            let props = parse_value(v, schema.implied).and_then(|m| flatten(&m)).ok_or("QEMU's key=value syntax")?;
            let mut out = vec![];
            for (k, v) in &props {
                let (_, rule) = schema.keys.iter().find(|(n, _)| n == k).ok_or("a property allowed for it")?;
                if !value_ok(rule, v) {
                    return Err(rule_text(rule));
                }
                out.push(format!("{k}={}", v.replace(',', ",,")));
            }
            Ok(Some(out.join(",")))
        }
        _ => Err("a flag without value, or an option with one"),
    }
}

/// A value as QEMU reads it: JSON when it starts with `{`, else
/// `key=value,...` with dotted keys nested (`file.filename=x`); `implied`
/// names a first item without `=` (`-smp 2`). `None` if it does not parse.
pub(in crate::vm::qemu) fn parse_value(value: &str, implied: Option<&str>) -> Option<Map<String, Value>> {
    if value.trim_start().starts_with('{') {
        return match serde_json::from_str::<Value>(value) {
            Ok(Value::Object(m)) if depth(&Value::Object(m.clone())) <= MAX_KEY_DEPTH => Some(m),
            _ => None,
        };
    }
    let mut m = Map::new();
    for (i, part) in split_keyval(value).into_iter().enumerate() {
        let (k, v) = match (part.split_once('='), implied) {
            (Some((k, v)), _) => (k.to_owned(), v.to_owned()),
            (None, Some(k)) if i == 0 => (k.to_owned(), part),
            // A bare key is QEMU's shorthand for key=on.
            (None, _) => (part, "on".to_owned()),
        };
        insert_dotted(&mut m, &k, Value::String(v))?;
    }
    Some(m)
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A scalar JSON value as QEMU's key=value text (`true` is `on`).
pub(in crate::vm::qemu) fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(if *b { "on" } else { "off" }.into()),
        _ => None,
    }
}

/// Nested properties as dotted keys with text values; `None` if a value is
/// not a scalar (a list, a null).
pub(in crate::vm::qemu) fn flatten(m: &Map<String, Value>) -> Option<std::collections::BTreeMap<String, String>> {
    fn walk(prefix: &str, m: &Map<String, Value>, out: &mut std::collections::BTreeMap<String, String>) -> Option<()> {
        for (k, v) in m {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                Value::Object(inner) => walk(&key, inner, out)?,
                other => drop(out.insert(key, scalar(other)?)),
            }
        }
        Some(())
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", m, &mut out)?;
    Some(out)
}

/// QEMU's size syntax: a number with an optional k/M/G/T suffix (binary units).
pub(in crate::vm::qemu) fn parse_qemu_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        (i, 'b' | 'B') => (&s[..i], 1),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Splits QEMU's `key=value,key=value` syntax (`,,` is a literal comma).
pub(in crate::vm::qemu) fn split_keyval(s: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                parts.last_mut().expect("non-empty").push(',');
            } else {
                parts.push(String::new());
            }
        } else {
            parts.last_mut().expect("non-empty").push(c);
        }
    }
    parts
}

/// Deepest dotted key accepted (`file.cache.direct` is 3): a peer's
/// `a.a.a…` cannot nest the map, or the checks, thousands of levels deep.
const MAX_KEY_DEPTH: usize = 8;

/// Nests `a.b.c=v` as QEMU's keyval does; `None` when a key is both a
/// value and an object, is given twice, or is nested too deep.
fn insert_dotted(m: &mut Map<String, Value>, key: &str, v: Value) -> Option<()> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() > MAX_KEY_DEPTH {
        return None;
    }
    let (last, path) = parts.split_last()?;
    let mut m = m;
    for head in path {
        m = m.entry(head.to_string()).or_insert_with(|| Value::Object(Map::new())).as_object_mut()?;
    }
    m.insert(last.to_string(), v).is_none().then_some(())
}

/// A QEMU id: a letter, then letters, digits, `-`, `_`, `.`.
pub(in crate::vm::qemu) fn is_id(s: &str) -> bool {
    s.len() <= 128
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn is_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && s.chars().all(|c| c.is_ascii_alphanumeric() || "_.:+-@".contains(c))
}

fn is_prop_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_keyvals() {
        assert_eq!(parse_qemu_size("512M"), Some(512 << 20));
        assert_eq!(parse_qemu_size("2G"), Some(2 << 30));
        assert_eq!(parse_qemu_size("4096"), Some(4096));
        assert_eq!(parse_qemu_size("x"), None);
        assert_eq!(split_keyval("a,b=c,,d,e"), vec!["a", "b=c,d", "e"]);
    }

    #[test]
    fn values_nest_and_flatten() {
        let m = parse_value("driver=raw,file.driver=file,file.filename=x", None).unwrap();
        let flat = flatten(&m).unwrap();
        assert_eq!(flat.get("file.filename").map(String::as_str), Some("x"));
        let deep = format!("driver=raw,{}=x", vec!["a"; 2000].join("."));
        assert!(parse_value(&deep, None).is_none(), "nesting is bounded");
        let json = format!("{}1{}", "{\"a\":".repeat(20), "}".repeat(20));
        assert!(parse_value(&json, None).is_none(), "JSON nesting is bounded too");
        assert!(parse_value("a=1,a=2", None).is_none(), "a key twice");
    }

    #[test]
    fn plain_options_are_checked_by_their_rules() {
        assert!(check_plain_option("rtc", Some("base=utc,clock=host")).is_ok());
        assert!(check_plain_option("no-reboot", None).is_ok());
        assert!(check_plain_option("fw_cfg", Some("name=opt/x,file=/etc/shadow")).is_err());
        // JSON whose string hides key=value pairs for QEMU's own parser.
        assert!(check_plain_option("fw_cfg", Some(r#"{"string":"a,file=/etc/passwd,name=opt/x"}"#)).is_err());
        // A value with commas is rebuilt with them doubled.
        let v = plain_option("fw_cfg", Some("name=opt/x,string=a,,file=/etc/passwd")).unwrap().unwrap();
        assert_eq!(v, "name=opt/x,string=a,,file=/etc/passwd");
        assert_eq!(plain_option("smbios", Some("type=1,serial=a,,b")).unwrap().unwrap(), "serial=a,,b,type=1");
        assert!(check_plain_option("D", Some("/tmp/x")).is_err());
        assert!(check_plain_option("no-reboot", Some("x")).is_err());
        assert!(check_device_prop("romfile", "/etc/shadow").is_err());
        assert!(check_cpu("host,x=a;b").is_err());
    }
}
