// Package config reads resource configurations in drbd.conf syntax (DRBD
// 8.3 and 8.4 forms) into typed, validated values.
//
// Syntax: words, "quoted strings" (escapes \" \\ \n \t \r), braces,
// semicolons and # comments; `include "glob";` at the top level, relative to
// the including file; `skip … { … }` discards a block. Sections: global
// (accepted, ignored), common (inherited by every resource), resource NAME
// with net, disk, syncer (8.3 names), startup, handlers, options,
// `on HOST [HOST…]` and `volume 0`. device, disk, meta-disk and address may
// sit at resource level or in `on`.
//
// Values are read as drbd.conf defines them: a bare number is in the
// option's unit (KiB/s for rates, bytes for sndbuf-size, 512-byte sectors
// for c-fill-target and congestion-fill, tenths of a second for timeout,
// ping-timeout, c-plan-ahead, c-delay-target and disk-timeout, seconds for
// ping-int, connect-int and the startup timeouts); K, M, G, T (powers of
// 1024) and s (sectors) suffixes give bytes. Each value is held in bytes,
// bytes per second or a time.Duration.
//
// Every error is one line naming file, line and column and what was
// expected. An unknown keyword is an error; a DRBD keyword nbdmirror
// deliberately ignores is accepted with one warning naming it
// (Config.Warnings). Every resource needs exactly two `on` sections.
// Limits: files of at most 1 MiB, 128 files, includes 8 deep, sections 16
// deep. The README's "Configuration" section lists every key, its default
// and how it differs from DRBD.
package config
