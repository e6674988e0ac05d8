// Package replicator is the domain of nbdmirror: resources, their roles,
// connection and disk states, the write path, resync and split-brain
// decisions (DESIGN.md §4, §7). It brings together the configuration
// (replicator/config), the local disk (blockdev), the metadata (metadisk,
// bitmap) and the peer link (transport).
//
// OpenMetaDevice finds and locks a resource's metadata as its configuration
// places it; the offline verbs (create-md, dump-md, apply-al) use it
// without a daemon.
//
// A Resource is one replicated disk on this node: roles and disk states as
// DRBD 8.4 names and orders them, the admin state changes with DRBD's
// refusal codes and texts, and the write path (activity log before the
// disk, bitmap marking); it satisfies nbd.Backend. Snapshot is its state
// for the status formats (WriteProc: /proc/drbd 8.4; WriteStatus: drbdadm
// status 9; StatusJSON).
//
// Resize (resize.go) is `nbdmirror resize`: the Primary agrees a new size
// with the peer over wire.Sizes (query, reply, set, done; only on peer
// protocol 4 and newer), both metadata areas are resized (metadisk.Resize)
// and the new area is resynced; the handshake's agreeSize brings a node
// that missed a resize to the agreed size. Adjust (adjust.go) applies a
// configuration read again: the keys that may change live go into the
// configuration in effect (conf, an atomic pointer), the others wait for
// the next up.
//
// CompareGenerations and Decide are the connect-time decision: DRBD 8.4's
// drbd_uuid_compare() rules in their order, then drbd_sync_handshake()'s
// disk-state override, after-sb policies, --discard-my-data resolution
// and refusals, logged in DRBD's words. Two departures: the protocol
// version codes (−1091, −1096, rule 41's feature flag) do not exist, as
// both sides always speak the one protocol; and two zero history UUIDs
// are not a common ancestor, so unrelated data is reported as unrelated
// rather than as a split brain.
package replicator
