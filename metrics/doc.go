// Package metrics serves a node daemon's state to Prometheus: what the
// resources' snapshots hold (roles, connection and disk states, bytes,
// out-of-sync data, resync progress, replication backlog and lag,
// authentication failures), read at every scrape, and the NBD front end's
// requests in flight and their latency, counted as they happen. It uses
// its own registry (no global state) and names its series in the style of
// drbd-reactor's prometheus plugin, prefixed nbdmirror_, with _total,
// _bytes and _seconds suffixes; states are one series per state with
// value 1 for the current one (drbd-reactor's "enums").
//
// The package reads replicator snapshots and satisfies nbd.Observer; the
// daemon (cmd/nbdmirror) serves Handler on --metrics-listen.
package metrics
