//! Reading the server's replies: a `GET`, the sync script's answer, scores as servers print
//! them; anything else is an error that says what came back.

use bb8_redis::redis::{self, RedisError};

use super::tracking::Synced;
use crate::error::StoreError;

/// Whether the sync script asked for the whole set to be read with a plain `ZRANGE`.
pub(super) fn reads_whole_set(reply: &redis::Value) -> bool {
    matches!(reply, redis::Value::Array(parts) if matches!(parts.get(1), Some(redis::Value::Int(2))))
}

pub(super) fn is_noscript(reply: Option<&redis::Value>) -> bool {
    matches!(reply, Some(redis::Value::ServerError(e)) if e.kind() == Some(redis::ServerErrorKind::NoScript))
}

/// A `GET` reply: a string or nil.
pub(super) fn bulk(value: redis::Value) -> Result<Option<Vec<u8>>, StoreError> {
    match value {
        redis::Value::BulkString(b) => Ok(Some(b)),
        redis::Value::Nil => Ok(None),
        other => Err(unexpected_reply(other, "GET")),
    }
}

/// Reads the sync script's answer: `{ epoch, whole, { member, score, ... } }`; `None` when
/// the records were gone by the time they were read.
pub(super) fn parse_synced(reply: redis::Value) -> Result<Option<Synced>, StoreError> {
    let redis::Value::Array(mut parts) = reply else {
        return Err(unexpected_reply(reply, "the sync script"));
    };
    if parts.len() != 3 {
        return Err(unexpected_reply(
            redis::Value::Array(parts),
            "the sync script",
        ));
    }
    let list = parts.pop().unwrap_or(redis::Value::Nil);
    let whole = parts.pop().unwrap_or(redis::Value::Nil);
    let epoch = parts.pop().unwrap_or(redis::Value::Nil);
    let (redis::Value::Int(epoch), redis::Value::Int(whole), redis::Value::Array(list)) =
        (epoch, whole, list)
    else {
        return Err(StoreError::Server(
            "the sync script answered values of the wrong types".into(),
        ));
    };
    let mut synced = Synced {
        epoch: u64::try_from(epoch).unwrap_or(0),
        whole: whole == 1,
        ..Synced::default()
    };
    // A script's reply is flat (member, score, ...); a plain ZRANGE over RESP3 answers
    // [member, score] pairs.
    let mut items = list.into_iter();
    let mut next_pair = || match items.next()? {
        redis::Value::Array(pair) if pair.len() == 2 => {
            let mut pair = pair.into_iter();
            Some((pair.next()?, pair.next()?))
        }
        member => Some((member, items.next()?)),
    };
    while let Some((member, score)) = next_pair() {
        let (redis::Value::BulkString(member), Some(score)) = (member, score_of(&score)) else {
            return Err(StoreError::Server(
                "the clear records hold an unreadable member".into(),
            ));
        };
        match member.as_slice() {
            b"seq" => synced.seq = Some(score),
            b"floor" => synced.floor = Some(score),
            // The set's own word on its epoch (a whole set read after the script).
            b"epoch" => synced.epoch = score,
            id => match <[u8; 8]>::try_from(id) {
                Ok(id) => synced.records.push((u64::from_le_bytes(id), score)),
                // Not ours: whatever wrote it, it cannot make an entry live.
                Err(_) => tracing::warn!("ignoring a foreign member in the clear records"),
            },
        }
    }
    if synced.epoch == 0 || synced.whole && synced.seq.is_none() {
        // The set vanished between the script and the whole read (evicted, flushed): this
        // lookup knows nothing, and the next one makes the set again.
        return Ok(None);
    }
    Ok(Some(synced))
}

/// A score as the server prints it: an integer, or a float for very large ones.
pub(super) fn score_of(value: &redis::Value) -> Option<u64> {
    let text = match value {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        redis::Value::SimpleString(s) => s.as_str(),
        redis::Value::Double(d) => return (d.is_finite() && *d >= 0.0).then_some(*d as u64),
        redis::Value::Int(n) => return u64::try_from(*n).ok(),
        _ => return None,
    };
    text.parse::<u64>().ok().or_else(|| {
        let f: f64 = text.parse().ok()?;
        (f.is_finite() && f >= 0.0).then_some(f as u64)
    })
}

pub(super) fn unexpected_reply(value: redis::Value, to: &str) -> StoreError {
    match value {
        redis::Value::ServerError(e) => StoreError::Server(Box::new(RedisError::from(e))),
        // Described, not printed: the value may be a whole entry.
        other => {
            let what = match &other {
                redis::Value::Array(items) => format!("an array of {} values", items.len()),
                redis::Value::Int(_) => "an integer".to_owned(),
                _ => "a value of another type".to_owned(),
            };
            StoreError::Server(format!("unexpected reply to {to}: {what}").into())
        }
    }
}

/// Whether a reply is a cluster's redirect (`MOVED`, `ASK`): the key's slot is served by
/// another node now.
pub(super) fn is_redirect_reply(reply: &redis::Value) -> bool {
    matches!(reply, redis::Value::ServerError(e) if matches!(e.kind(), Some(redis::ServerErrorKind::Moved | redis::ServerErrorKind::Ask)))
}

/// Whether an error is a cluster's redirect.
pub(super) fn is_redirect(e: &StoreError) -> bool {
    match e {
        StoreError::Server(e) => e
            .downcast_ref::<RedisError>()
            .is_some_and(|e| e.redirect_node().is_some()),
        _ => false,
    }
}

/// How many replicas a `ROLE` reply lists as attached to a master (0 for a replica).
pub(super) fn replicas_in_role(role: &redis::Value) -> i64 {
    let redis::Value::Array(parts) = role else {
        return 0;
    };
    let is_master = matches!(parts.first(), Some(redis::Value::BulkString(b)) if b == b"master")
        || matches!(parts.first(), Some(redis::Value::SimpleString(s)) if s == "master");
    match parts.get(2) {
        Some(redis::Value::Array(replicas)) if is_master => replicas.len() as i64,
        _ => 0,
    }
}

/// What a failed command means for the store: a timeout, the server out of reach (the
/// connection is replaced), or an answer it gave.
pub(super) fn classify(e: RedisError) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout;
    }
    if e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
    {
        StoreError::Unavailable(Box::new(e))
    } else {
        StoreError::Server(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_read_as_servers_print_them() {
        let bulk = |s: &str| redis::Value::BulkString(s.as_bytes().to_vec());
        assert_eq!(score_of(&bulk("17")), Some(17));
        assert_eq!(
            score_of(&bulk("4503599627370495")),
            Some(4_503_599_627_370_495)
        );
        assert_eq!(
            score_of(&bulk("4.503599627370495e+15")),
            Some(4_503_599_627_370_495)
        );
        assert_eq!(score_of(&redis::Value::Double(3.0)), Some(3));
        assert_eq!(score_of(&bulk("x")), None);
        assert_eq!(score_of(&bulk("-1")), None);
    }

    #[test]
    fn sync_replies_are_checked() {
        let bulk = |s: &[u8]| redis::Value::BulkString(s.to_vec());
        let reply = |list: Vec<redis::Value>| {
            redis::Value::Array(vec![
                redis::Value::Int(5),
                redis::Value::Int(0),
                redis::Value::Array(list),
            ])
        };
        let ok = parse_synced(reply(vec![
            bulk(b"seq"),
            bulk(b"9"),
            bulk(&7u64.to_le_bytes()),
            bulk(b"8"),
            bulk(b"epoch"),
            bulk(b"5"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (ok.epoch, ok.whole, ok.seq, ok.floor),
            (5, false, Some(9), None)
        );
        assert_eq!(ok.records, vec![(7, 8)]);
        assert!(parse_synced(reply(vec![bulk(b"seq"), bulk(b"x")])).is_err());
        assert!(parse_synced(redis::Value::Nil).is_err());
        assert!(parse_synced(redis::Value::Array(vec![])).is_err());
        // A whole read that found the set gone: nothing known, not an error.
        let gone = redis::Value::Array(vec![
            redis::Value::Int(0),
            redis::Value::Int(1),
            redis::Value::Array(vec![]),
        ]);
        assert!(parse_synced(gone).unwrap().is_none());
        // RESP3 pairs, as a plain ZRANGE answers.
        let pairs = redis::Value::Array(vec![
            redis::Value::Int(0),
            redis::Value::Int(1),
            redis::Value::Array(vec![
                redis::Value::Array(vec![bulk(b"floor"), redis::Value::Double(2.0)]),
                redis::Value::Array(vec![bulk(b"seq"), redis::Value::Double(4.0)]),
                redis::Value::Array(vec![bulk(b"epoch"), redis::Value::Double(9.0)]),
            ]),
        ]);
        let whole = parse_synced(pairs).unwrap().unwrap();
        assert_eq!((whole.epoch, whole.seq, whole.floor), (9, Some(4), Some(2)));
    }
}
