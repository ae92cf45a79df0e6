//! The watch call: one stream of changes under a prefix from a revision on, read
//! line by line from the gateway and sent on as [`Event`]s until it ends (cancelled,
//! compacted, or the receiver gone). Not the progress check that tells a stalled
//! watch ([`Etcd::progress`], with the other calls in `etcd`), nor what a member does
//! with the events (`member`).

use super::wire::{Bytes64, WatchCreateRequest, WatchLine, WatchRequest, I64};
use super::{prefix_end, unreachable, Etcd, EtcdError, Event, WatchEnd};

impl Etcd {
    /// Watches every key under `prefix` from revision `from` on, through endpoint
    /// `idx`, sending each change to `tx` until the stream ends. Connecting is bounded
    /// by one attempt's time; the stream itself is not (the caller checks the
    /// endpoint's [`Etcd::progress`] beside it and drops this future when it stalls).
    pub async fn watch(
        &self,
        idx: usize,
        prefix: &str,
        from: i64,
        tx: &tokio::sync::mpsc::Sender<Event>,
    ) -> Result<WatchEnd, EtcdError> {
        let n = self.endpoints.len().max(1);
        let endpoint = self
            .endpoints
            .get(idx % n)
            .ok_or_else(|| EtcdError::Unreachable("no endpoint configured".into()))?;
        let body = serde_json::to_vec(&WatchRequest {
            create_request: WatchCreateRequest {
                key: prefix.into(),
                range_end: Bytes64(prefix_end(prefix)),
                start_revision: I64(from),
            },
        })
        .expect("requests always serialize");
        let connect = async {
            let token = self.auth_token(endpoint).await?;
            self.post(endpoint, "/v3/watch", body, token.as_deref())
                .await
        };
        let limit = self.limit();
        let mut resp = tokio::time::timeout(limit, connect).await.map_err(|_| {
            EtcdError::Unreachable(format!("{endpoint}: no answer within {limit:?}"))
        })??;
        if resp.status().as_u16() != 200 {
            return Err(EtcdError::Unreachable(format!(
                "{endpoint}: watch answered HTTP {}",
                resp.status().as_u16()
            )));
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut last = from.saturating_sub(1);
        while let Some(chunk) = resp.chunk().await.map_err(|e| unreachable(endpoint, e))? {
            buf.extend_from_slice(&chunk);
            if buf.len() > 16 * 1024 * 1024 {
                return Err(EtcdError::Malformed {
                    endpoint: endpoint.to_string(),
                    reason: "a watch message larger than 16 MiB".into(),
                });
            }
            // The gateway writes one JSON object per line.
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let Ok(WatchLine {
                    result: Some(result),
                }) = serde_json::from_slice::<WatchLine>(&line)
                else {
                    continue;
                };
                if result.compact_revision.0 > 0 {
                    return Ok(WatchEnd::Compacted {
                        compact_revision: result.compact_revision.0,
                    });
                }
                if result.canceled {
                    return Ok(WatchEnd::Ended { last });
                }
                last = last.max(result.header.revision.0);
                for e in result.events {
                    let Some(kv) = e.kv.into_kv() else { continue };
                    last = last.max(kv.mod_revision);
                    let event = if e.kind.as_deref() == Some("DELETE") {
                        Event::Delete {
                            key: kv.key,
                            mod_revision: kv.mod_revision,
                        }
                    } else {
                        Event::Put(kv)
                    };
                    if tx.send(event).await.is_err() {
                        return Ok(WatchEnd::Ended { last });
                    }
                }
            }
        }
        Ok(WatchEnd::Ended { last })
    }
}
