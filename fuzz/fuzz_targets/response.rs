//! Response headers: Cache-Control, Expires, Date, Age, Vary, tag headers.
//! Input: two bytes of status, then `name \x01 value` header pairs separated by `\0`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = 100 + u16::from_le_bytes([data[0], data[1]]) % 500;
    let headers: Vec<(&[u8], &[u8])> = data[2..]
        .split(|&b| b == 0)
        .filter_map(|f| {
            let at = f.iter().position(|&b| b == 1)?;
            Some((&f[..at], &f[at + 1..]))
        })
        .collect();
    tower_cache_aside::__private::fuzz::response(status, &headers);
});
