// Package archtest holds the test that keeps package imports pointing the
// way DESIGN.md §3 draws them; it has no code of its own.
package archtest
