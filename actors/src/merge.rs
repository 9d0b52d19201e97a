//! A List over a ring: every live pair of the cluster, in key order, from nodes that each hold
//! only some partitions.
//!
//! Each partition is read from one of its holders: this node where it holds it, else the first
//! of the partition's holders that answers (those seen up first). Each node sends the pairs of
//! its share of the partitions in key order, so the List is a k-way merge of one sorted stream
//! per node read from (two from a node asked again for the partitions of one that did not
//! answer). No partition is read from two nodes, so no key
//! comes twice. What the merge holds is one pair per stream, plus what each stream buffers:
//! memory bounded by the streams, not by the key count.

use futures::StreamExt;
use futures::stream::BoxStream;

use crate::peer::PeerError;

/// A sorted stream of pairs from one node.
pub type Pairs = BoxStream<'static, Result<(String, String), PeerError>>;

/// Why a List over a ring could not go on.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(
        "{partitions} partitions have no holder that answered (this node holds none of them): {}",
        missing.join(", ")
    )]
    NoHolder {
        partitions: usize,
        /// Each holder that did not answer, with why: "addr (reason)".
        missing: Vec<String>,
    },
    #[error("{peer} stopped sending its share of the List: {error}")]
    Broken { peer: String, error: PeerError },
    #[error(transparent)]
    Local(#[from] crate::Error),
}

/// One source of a merge: its name (for errors) and its pairs.
pub struct Source {
    pub name: String,
    pub pairs: Pairs,
}

/// Merges sorted streams of pairs with no key in common into one sorted stream, in chunks of
/// up to `keys` pairs that stop once they hold `bytes`. The first error ends it.
pub fn merge(
    sources: Vec<Source>,
    keys: usize,
    bytes: usize,
) -> BoxStream<'static, Result<Vec<(String, String)>, ListError>> {
    struct State {
        sources: Vec<Source>,
        /// Each source's next pair; `None` once it is done. Filled on the first poll.
        heads: Option<Vec<Option<(String, String)>>>,
        failed: bool,
    }
    async fn next(source: &mut Source) -> Result<Option<(String, String)>, ListError> {
        match source.pairs.next().await {
            None => Ok(None),
            Some(Ok(pair)) => Ok(Some(pair)),
            Some(Err(error)) => Err(ListError::Broken {
                peer: source.name.clone(),
                error,
            }),
        }
    }
    let state = State {
        sources,
        heads: None,
        failed: false,
    };
    futures::stream::unfold(state, move |mut state| async move {
        if state.failed {
            return None;
        }
        if state.heads.is_none() {
            let firsts = futures::future::join_all(state.sources.iter_mut().map(next)).await;
            match firsts.into_iter().collect::<Result<Vec<_>, _>>() {
                Ok(heads) => state.heads = Some(heads),
                Err(error) => {
                    state.failed = true;
                    return Some((Err(error), state));
                }
            }
        }
        let mut chunk = Vec::new();
        let mut held = 0;
        while chunk.len() < keys && held < bytes {
            let heads = state.heads.as_mut().expect("filled above");
            let Some(i) = (0..heads.len())
                .filter(|&i| heads[i].is_some())
                .min_by(|&a, &b| {
                    heads[a]
                        .as_ref()
                        .map(|p| &p.0)
                        .cmp(&heads[b].as_ref().map(|p| &p.0))
                })
            else {
                break;
            };
            match next(&mut state.sources[i]).await {
                Ok(after) => {
                    let pair = std::mem::replace(&mut heads[i], after).expect("chosen as some");
                    held += pair.0.len() + pair.1.len();
                    chunk.push(pair);
                }
                Err(error) => {
                    state.failed = true;
                    return Some((Err(error), state));
                }
            }
        }
        (!chunk.is_empty()).then_some((Ok(chunk), state))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, keys: &[&str]) -> Source {
        let pairs: Vec<Result<(String, String), PeerError>> = (keys.iter())
            .map(|k| Ok((k.to_string(), format!("{name}:{k}"))))
            .collect();
        Source {
            name: name.into(),
            pairs: futures::stream::iter(pairs).boxed(),
        }
    }

    async fn all(sources: Vec<Source>, keys: usize) -> Vec<Vec<String>> {
        let chunks: Vec<_> = merge(sources, keys, usize::MAX).collect().await;
        (chunks.into_iter())
            .map(|c| c.unwrap().into_iter().map(|(k, _)| k).collect())
            .collect()
    }

    #[tokio::test]
    async fn sorted_streams_merge_in_key_order_in_chunks() {
        let sources = vec![
            source("a", &["b", "e", "f"]),
            source("b", &[]),
            source("c", &["a", "c", "d", "g"]),
        ];
        let chunks = all(sources, 3).await;
        assert_eq!(
            chunks,
            [vec!["a", "b", "c"], vec!["d", "e", "f"], vec!["g"]]
        );
        // Each pair keeps its value.
        let pairs: Vec<_> = merge(vec![source("x", &["k"])], 10, 10).collect().await;
        assert_eq!(pairs[0].as_ref().unwrap()[0].1, "x:k");
        assert!(all(Vec::new(), 3).await.is_empty());
        assert!(all(vec![source("a", &[])], 3).await.is_empty());
    }

    #[tokio::test]
    async fn a_chunk_stops_once_it_holds_its_bytes() {
        let sources = vec![source("a", &["a", "c"]), source("b", &["b", "d"])];
        // Each pair holds 1 + 3 bytes: a chunk of 8 bytes ends once its second pair makes it
        // full, not after a third.
        let chunks: Vec<_> = merge(sources, 10, 8).collect().await;
        let sizes: Vec<usize> = chunks.iter().map(|c| c.as_ref().unwrap().len()).collect();
        assert_eq!(sizes, [2, 2]);
    }

    #[tokio::test]
    async fn a_source_that_breaks_ends_the_merge_naming_it() {
        let broken = Source {
            name: "db2".into(),
            pairs: futures::stream::iter(vec![
                Ok(("b".to_string(), String::new())),
                Err(PeerError::Unreachable("reset".into())),
            ])
            .boxed(),
        };
        let chunks: Vec<_> = merge(vec![source("a", &["a", "c"]), broken], 1, 100)
            .collect()
            .await;
        let keys: Vec<String> = (chunks.iter())
            .filter_map(|c| Some(c.as_ref().ok()?[0].0.clone()))
            .collect();
        assert_eq!(keys, ["a"], "{chunks:?}");
        let error = chunks.last().unwrap().as_ref().unwrap_err().to_string();
        assert!(error.contains("db2") && error.contains("reset"), "{error}");
        assert_eq!(chunks.len(), 2, "nothing after the error");
    }
}
