package config

import (
	"errors"
	"fmt"
	"io/fs"
	"path"
	"slices"
)

// Limits on what a configuration may make the parser do.
const (
	maxFileSize     = 1 << 20
	maxFiles        = 128
	maxIncludeDepth = 8
	maxNesting      = 16
)

// node is a statement (`keyword args;`) or a section (`keyword args { … }`).
type node struct {
	key   token
	args  []token
	block []*node
	isSec bool
}

// parser reads the files of one configuration.
type parser struct {
	fsys  fs.FS
	files []string
}

// parseFile parses one file and the files it includes, returning the
// top-level nodes in order.
func (p *parser) parseFile(name string, depth int, from Pos) ([]*node, error) {
	if len(p.files) >= maxFiles {
		return nil, errAt(from, "more than %d configuration files: check the include patterns", maxFiles)
	}
	if slices.Contains(p.files, name) {
		return nil, errAt(from, "%s is included twice (an include loop?)", name)
	}
	p.files = append(p.files, name)
	fi, err := fs.Stat(p.fsys, name)
	if err != nil {
		return nil, fileErr(from, name, err)
	}
	if fi.Size() > maxFileSize {
		return nil, errAt(from, "%s is larger than 1 MiB: not a configuration file?", name)
	}
	src, err := fs.ReadFile(p.fsys, name)
	if err != nil {
		return nil, fileErr(from, name, err)
	}
	lx := newLexer(name, string(src))
	var nodes []*node
	for {
		t, err := lx.next()
		if err != nil {
			return nil, err
		}
		switch {
		case t.kind == tokEOF:
			return nodes, nil
		case t.kind == tokRBrace:
			return nil, errAt(t.pos, `unexpected "}": no section is open here`)
		case t.kind != tokWord:
			return nil, errAt(t.pos, "expected a keyword (global, common, resource, include), found %s", t.describe())
		case t.text == "include":
			inc, err := p.include(lx, t, depth)
			if err != nil {
				return nil, err
			}
			nodes = append(nodes, inc...)
		case t.text == "skip":
			if err := skip(lx, t); err != nil {
				return nil, err
			}
		default:
			n, err := parseNode(lx, t, 0)
			if err != nil {
				return nil, err
			}
			nodes = append(nodes, n)
		}
	}
}

func fileErr(from Pos, name string, err error) error {
	if from.File == "" {
		return fmt.Errorf("read configuration %s: %w", name, err)
	}
	return errAt(from, "cannot read %s: %v", name, errors.Unwrap(err))
}

// include handles `include "glob";` relative to the including file.
func (p *parser) include(lx *lexer, kw token, depth int) ([]*node, error) {
	arg, err := lx.next()
	if err != nil {
		return nil, err
	}
	if arg.kind != tokWord && arg.kind != tokString {
		return nil, errAt(arg.pos, `expected a file pattern after include, found %s`, arg.describe())
	}
	semi, err := lx.next()
	if err != nil {
		return nil, err
	}
	if semi.kind != tokSemi {
		return nil, errAt(semi.pos, `expected ";" after include %q, found %s`, arg.text, semi.describe())
	}
	if depth >= maxIncludeDepth {
		return nil, errAt(kw.pos, "includes nested more than %d deep", maxIncludeDepth)
	}
	pattern := arg.text
	if !path.IsAbs(pattern) {
		pattern = path.Join(path.Dir(kw.pos.File), pattern)
	}
	matches, err := fs.Glob(p.fsys, pattern)
	if err != nil {
		return nil, errAt(arg.pos, "bad include pattern %q: %v", arg.text, err)
	}
	var nodes []*node
	for _, m := range matches {
		sub, err := p.parseFile(m, depth+1, kw.pos)
		if err != nil {
			return nil, err
		}
		nodes = append(nodes, sub...)
	}
	return nodes, nil
}

// skip discards `skip … { … }`, drbd.conf's way to comment out a section.
func skip(lx *lexer, kw token) error {
	level := 0
	for {
		t, err := lx.next()
		if err != nil {
			return err
		}
		switch t.kind {
		case tokEOF:
			return errAt(kw.pos, `skip: expected a "{ … }" block to skip, found the end of the file`)
		case tokLBrace:
			level++
		case tokRBrace:
			level--
			if level == 0 {
				return nil
			}
		}
	}
}

// parseNode parses the rest of a statement or section after its keyword.
func parseNode(lx *lexer, kw token, nesting int) (*node, error) {
	if nesting > maxNesting {
		return nil, errAt(kw.pos, "sections nested more than %d deep", maxNesting)
	}
	n := &node{key: kw}
	for {
		t, err := lx.next()
		if err != nil {
			return nil, err
		}
		switch t.kind {
		case tokWord, tokString:
			n.args = append(n.args, t)
		case tokSemi:
			return n, nil
		case tokLBrace:
			n.isSec = true
			return n, parseBlock(lx, n, nesting)
		case tokRBrace:
			return nil, errAt(t.pos, `expected ";" to end %q, found "}"`, kw.text)
		case tokEOF:
			return nil, errAt(t.pos, `expected ";" or "{" after %q, found the end of the file`, kw.text)
		}
	}
}

func parseBlock(lx *lexer, sec *node, nesting int) error {
	for {
		t, err := lx.next()
		if err != nil {
			return err
		}
		switch {
		case t.kind == tokRBrace:
			return nil
		case t.kind == tokEOF:
			return errAt(sec.key.pos, `section %q is not closed: expected "}" before the end of the file`, sec.key.text)
		case t.kind != tokWord:
			return errAt(t.pos, "expected a keyword in %s, found %s", sec.key.text, t.describe())
		case t.text == "include":
			return errAt(t.pos, "include is allowed only at the top level of a file, not inside %s", sec.key.text)
		case t.text == "skip":
			if err := skip(lx, t); err != nil {
				return err
			}
		default:
			n, err := parseNode(lx, t, nesting+1)
			if err != nil {
				return err
			}
			sec.block = append(sec.block, n)
		}
	}
}
