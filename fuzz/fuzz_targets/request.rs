//! A request: its URI (path, query, percent-encoding) and headers (host, vary, credentials).
//! Input: the URI, then `name \x01 value` header pairs, separated by `\0`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut fields = data.split(|&b| b == 0);
    let uri = String::from_utf8_lossy(fields.next().unwrap_or_default());
    let headers: Vec<(&[u8], &[u8])> = fields
        .filter_map(|f| {
            let at = f.iter().position(|&b| b == 1)?;
            Some((&f[..at], &f[at + 1..]))
        })
        .collect();
    tower_cache_aside::__private::fuzz::request(&uri, &headers);
});
