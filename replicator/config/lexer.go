package config

import (
	"fmt"
	"strings"
)

// Pos is a place in a configuration file.
type Pos struct {
	File      string
	Line, Col int
}

func (p Pos) String() string { return fmt.Sprintf("%s:%d:%d", p.File, p.Line, p.Col) }

// Error is a configuration error at a place in a file.
type Error struct {
	Pos Pos
	Msg string
}

func (e *Error) Error() string { return e.Pos.String() + ": " + e.Msg }

func errAt(p Pos, format string, args ...any) error {
	return &Error{Pos: p, Msg: fmt.Sprintf(format, args...)}
}

type tokKind int

const (
	tokEOF tokKind = iota
	tokWord
	tokString
	tokLBrace
	tokRBrace
	tokSemi
)

func (k tokKind) String() string {
	switch k {
	case tokEOF:
		return "end of file"
	case tokWord:
		return "a word"
	case tokString:
		return "a quoted string"
	case tokLBrace:
		return `"{"`
	case tokRBrace:
		return `"}"`
	case tokSemi:
		return `";"`
	}
	return "?"
}

type token struct {
	kind tokKind
	text string // the word, or the string's value with escapes resolved
	pos  Pos
}

// describe names a token for an error message.
func (t token) describe() string {
	switch t.kind {
	case tokWord:
		return fmt.Sprintf("%q", t.text)
	case tokString:
		return fmt.Sprintf("the string %q", t.text)
	}
	return t.kind.String()
}

// lexer splits drbd.conf syntax into tokens: words, "quoted strings" with
// backslash escapes, braces and semicolons; # starts a comment to the end
// of the line.
type lexer struct {
	src       string
	file      string
	off       int
	line, col int
}

func newLexer(file, src string) *lexer { return &lexer{src: src, file: file, line: 1, col: 1} }

func (l *lexer) pos() Pos { return Pos{l.file, l.line, l.col} }

func (l *lexer) advance() byte {
	c := l.src[l.off]
	l.off++
	if c == '\n' {
		l.line, l.col = l.line+1, 1
	} else {
		l.col++
	}
	return c
}

func isSpace(c byte) bool {
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'
}

func isWordByte(c byte) bool {
	return !isSpace(c) && c != '{' && c != '}' && c != ';' && c != '"' && c != '#'
}

// next returns the next token.
func (l *lexer) next() (token, error) {
	for l.off < len(l.src) {
		c := l.src[l.off]
		switch {
		case isSpace(c):
			l.advance()
		case c == '#':
			for l.off < len(l.src) && l.src[l.off] != '\n' {
				l.advance()
			}
		default:
			return l.token()
		}
	}
	return token{kind: tokEOF, pos: l.pos()}, nil
}

func (l *lexer) token() (token, error) {
	p := l.pos()
	switch c := l.src[l.off]; c {
	case '{':
		l.advance()
		return token{tokLBrace, "{", p}, nil
	case '}':
		l.advance()
		return token{tokRBrace, "}", p}, nil
	case ';':
		l.advance()
		return token{tokSemi, ";", p}, nil
	case '"':
		return l.quoted(p)
	}
	start := l.off
	for l.off < len(l.src) && isWordByte(l.src[l.off]) {
		l.advance()
	}
	return token{tokWord, l.src[start:l.off], p}, nil
}

// quoted reads a "string": \" \\ \n \t and \r are escapes; a newline or
// the end of the file before the closing quote is an error.
func (l *lexer) quoted(p Pos) (token, error) {
	l.advance() // opening quote
	var b strings.Builder
	for {
		if l.off >= len(l.src) {
			return token{}, errAt(p, "unterminated string: expected a closing '\"'")
		}
		c := l.advance()
		switch c {
		case '"':
			return token{tokString, b.String(), p}, nil
		case '\n':
			return token{}, errAt(p, "unterminated string: a newline before the closing '\"'")
		case '\\':
			if l.off >= len(l.src) {
				return token{}, errAt(p, "unterminated string: expected a closing '\"'")
			}
			e := l.advance()
			switch e {
			case 'n':
				b.WriteByte('\n')
			case 't':
				b.WriteByte('\t')
			case 'r':
				b.WriteByte('\r')
			case '"', '\\':
				b.WriteByte(e)
			default:
				return token{}, errAt(Pos{p.File, l.line, l.col - 2}, `unknown escape \%c in string: use \" \\ \n \t or \r`, e)
			}
		default:
			b.WriteByte(c)
		}
	}
}
