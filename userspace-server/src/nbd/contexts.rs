//! The metadata contexts an export offers and how client queries name them.
//!
//! - `base:allocation`: every block is allocated data (flags 0): a snapshot has no holes the
//!   server could cheaply point out, and 0 is always a truthful answer.
//! - `sanblk:changed`: [`CHANGED_FLAG`] on the blocks that changed since the previous snapshot.
//!
//! A bare namespace (`base:`, `sanblk:`) lists every context in it but selects none, as the
//! protocol asks for `base:`.

use sanblk_proto::nbd::{BASE_ALLOCATION, CHANGED_CONTEXT};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MetaContext {
    Allocation,
    Changed,
}

impl MetaContext {
    const ALL: [MetaContext; 2] = [MetaContext::Allocation, MetaContext::Changed];

    pub(super) fn name(self) -> &'static str {
        match self {
            MetaContext::Allocation => BASE_ALLOCATION,
            MetaContext::Changed => CHANGED_CONTEXT,
        }
    }

    /// The id the context gets when selected. Fixed per context, so ids are unique within any
    /// selection, which is all the protocol asks of them.
    pub(super) fn id(self) -> u32 {
        match self {
            MetaContext::Allocation => 1,
            MetaContext::Changed => 2,
        }
    }

    fn namespace(self) -> &'static str {
        let name = self.name();
        name.split_once(':')
            .map_or(name, |(namespace, _)| namespace)
    }
}

/// Whether a query has the one piece of syntax the protocol requires: a namespace and a colon.
pub(super) fn query_well_formed(query: &str) -> bool {
    matches!(query.split_once(':'), Some((namespace, _)) if !namespace.is_empty())
}

/// The contexts `NBD_OPT_LIST_META_CONTEXT` reports for `queries`, each once, in catalog
/// order: all of them for no query, a whole namespace for a bare one, else exact names.
/// Unknown namespaces and names match nothing, as the protocol requires.
pub(super) fn listed(queries: &[String]) -> Vec<MetaContext> {
    if queries.is_empty() {
        return MetaContext::ALL.to_vec();
    }
    MetaContext::ALL
        .into_iter()
        .filter(|context| {
            queries.iter().any(|query| {
                query == context.name() || query.strip_suffix(':') == Some(context.namespace())
            })
        })
        .collect()
}

/// The contexts `NBD_OPT_SET_META_CONTEXT` selects for `queries`: only exact names, each once.
pub(super) fn selected(queries: &[String]) -> Vec<MetaContext> {
    MetaContext::ALL
        .into_iter()
        .filter(|context| queries.iter().any(|query| query == context.name()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queries(list: &[&str]) -> Vec<String> {
        list.iter().map(|query| query.to_string()).collect()
    }

    #[test]
    fn listing_takes_namespaces_as_wildcards() {
        use MetaContext::*;
        assert_eq!(listed(&[]), vec![Allocation, Changed]);
        assert_eq!(listed(&queries(&["sanblk:"])), vec![Changed]);
        assert_eq!(listed(&queries(&["base:"])), vec![Allocation]);
        assert_eq!(
            listed(&queries(&["sanblk:changed", "base:allocation", "base:"])),
            vec![Allocation, Changed]
        );
        assert_eq!(
            listed(&queries(&["qemu:dirty-bitmap:x", "sanblk:other"])),
            vec![]
        );
    }

    #[test]
    fn selecting_takes_exact_names_only() {
        use MetaContext::*;
        assert_eq!(selected(&[]), vec![]);
        assert_eq!(selected(&queries(&["base:", "sanblk:"])), vec![]);
        assert_eq!(
            selected(&queries(&["sanblk:changed", "sanblk:changed"])),
            vec![Changed]
        );
        assert_eq!(
            selected(&queries(&[
                "base:allocation",
                "x-foo:bar",
                "sanblk:changed"
            ])),
            vec![Allocation, Changed]
        );
    }

    #[test]
    fn queries_need_a_namespace() {
        assert!(query_well_formed("base:"));
        assert!(query_well_formed("sanblk:changed"));
        assert!(!query_well_formed("allocation"));
        assert!(!query_well_formed(":allocation"));
        assert!(!query_well_formed(""));
    }
}
