//! tokend.toml(5) from the book's configuration chapter: the Markdown the book shows,
//! as a man page, so the two cannot disagree. Covers what that chapter uses: headings,
//! paragraphs, lists, code blocks, tables (each row a tagged paragraph: the first cell
//! is the tag, the others follow, each named by its column unless it is the last),
//! inline code (bold), emphasis and links (their text; a link into the book is no use
//! in a terminal).

use pulldown_cmark::{Event, HeadingLevel, Options, Parser, Tag, TagEnd};

/// The whole page: a NAME line, then the chapter from its first `##` heading on (its
/// title and introduction become DESCRIPTION).
pub fn config_page(markdown: &str, version: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH TOKEND.TOML 5 \"\" \"tokend {version}\" \"tokend manual\"\n"
    ));
    out.push_str(".SH NAME\ntokend.toml \\- the configuration file of tokend\n");
    out.push_str(".SH SYNOPSIS\n\\fI/etc/tokend/config.toml\\fR\n");
    out.push_str(".SH DESCRIPTION\n");
    out.push_str(&render(markdown));
    out.push_str(
        ".SH \"SEE ALSO\"\n\\fBtokend\\fR(1), \\fBtokend\\-check\\fR(1), \\fBtokend\\-run\\fR(1)\n",
    );
    out
}

#[derive(Default)]
struct Writer {
    out: String,
    /// Fonts in effect, innermost last (`B`, `I`).
    fonts: Vec<char>,
    /// Within a code span or block: `-` is a minus sign there.
    code: bool,
    /// Within a fenced or indented code block.
    block: bool,
    /// Nested list depth.
    lists: usize,
    /// Table state: the header cells, the current row's cells, the cell being written.
    header: Vec<String>,
    row: Vec<String>,
    cell: Option<String>,
    in_head: bool,
    /// Heading text is collected, then written uppercased (SH) or as is (SS).
    heading: Option<(HeadingLevel, String)>,
}

fn render(markdown: &str) -> String {
    let mut w = Writer::default();
    let parser = Parser::new_ext(markdown, Options::ENABLE_TABLES);
    for event in parser {
        w.event(event);
    }
    w.out
}

impl Writer {
    /// Where text goes now: a table cell, a heading, or the page.
    fn text(&mut self, s: &str) {
        let escaped = escape(s, self.code, self.block);
        if let Some(cell) = &mut self.cell {
            cell.push_str(&escaped);
        } else if let Some((_, h)) = &mut self.heading {
            h.push_str(s);
        } else {
            if self.out.ends_with('\n') && !self.block {
                self.out.push_str(&line_start(&escaped));
            } else {
                self.out.push_str(&escaped);
            }
        }
    }

    fn raw(&mut self, s: &str) {
        if let Some(cell) = &mut self.cell {
            cell.push_str(s);
        } else if self.heading.is_none() {
            self.out.push_str(s);
        }
    }

    /// A request on a line of its own.
    fn request(&mut self, s: &str) {
        if !self.out.is_empty() && !self.out.ends_with('\n') {
            self.out.push('\n');
        }
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn font(&mut self, f: char) {
        self.fonts.push(f);
        self.raw(&format!("\\f{f}"));
    }

    fn end_font(&mut self) {
        self.fonts.pop();
        let f = self.fonts.last().copied().unwrap_or('R');
        self.raw(&format!("\\f{f}"));
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Start(tag) => self.start(tag),
            Event::End(tag) => self.end(tag),
            Event::Text(t) => {
                if self.block {
                    for line in t.split_inclusive('\n') {
                        self.text(line);
                    }
                } else {
                    self.text(&t.replace('\n', " "));
                }
            }
            Event::Code(t) => {
                self.font('B');
                self.code = true;
                self.text(&t);
                self.code = false;
                self.end_font();
            }
            Event::SoftBreak => self.text(" "),
            Event::HardBreak => self.request(".br"),
            Event::Html(_) | Event::InlineHtml(_) => {}
            Event::Rule => self.request(".PP"),
            _ => {}
        }
    }

    fn start(&mut self, tag: Tag) {
        match tag {
            Tag::Heading { level, .. } => self.heading = Some((level, String::new())),
            Tag::Paragraph if self.cell.is_none() => {
                if self.lists == 0 {
                    self.request(".PP");
                } else if !self.out.ends_with("2\n") {
                    // A second paragraph inside a list item.
                    self.request(".IP \"\" 2");
                }
            }
            Tag::CodeBlock(_) => {
                self.request(".PP");
                self.request(".RS 2");
                self.request(".nf");
                self.block = true;
                self.code = true;
            }
            Tag::List(_) => {
                if self.lists > 0 {
                    self.request(".RS 2");
                }
                self.lists += 1;
            }
            Tag::Item => self.request(".IP \\(bu 2"),
            Tag::Emphasis => self.font('I'),
            Tag::Strong => self.font('B'),
            Tag::Table(_) => {
                self.header.clear();
            }
            Tag::TableHead => self.in_head = true,
            Tag::TableRow => self.row.clear(),
            Tag::TableCell => self.cell = Some(String::new()),
            _ => {}
        }
    }

    fn end(&mut self, tag: TagEnd) {
        match tag {
            TagEnd::Heading(_) => {
                let (level, text) = self.heading.take().expect("a heading was started");
                let text = escape(&text, false, false).replace('"', "\\(dq");
                match level {
                    HeadingLevel::H1 => {}
                    HeadingLevel::H2 => self.request(&format!(".SH \"{}\"", text.to_uppercase())),
                    _ => self.request(&format!(".SS \"{text}\"")),
                }
            }
            TagEnd::Paragraph if self.cell.is_none() => self.raw("\n"),
            TagEnd::CodeBlock => {
                self.block = false;
                self.code = false;
                self.request(".fi");
                self.request(".RE");
            }
            TagEnd::List(_) => {
                self.lists -= 1;
                if self.lists > 0 {
                    self.request(".RE");
                } else {
                    self.request(".PP");
                }
            }
            TagEnd::Emphasis | TagEnd::Strong => self.end_font(),
            TagEnd::TableCell => {
                let cell = self.cell.take().unwrap_or_default();
                self.row.push(cell.trim().to_owned());
            }
            TagEnd::TableHead => {
                self.in_head = false;
                self.header = std::mem::take(&mut self.row);
            }
            TagEnd::TableRow => self.table_row(),
            TagEnd::Table => self.request(".PP"),
            _ => {}
        }
    }

    fn table_row(&mut self) {
        let row = std::mem::take(&mut self.row);
        let Some((tag, rest)) = row.split_first() else {
            return;
        };
        self.request(".TP");
        self.request(&line_start(tag));
        let last = rest.len();
        let mut first = true;
        for (i, cell) in rest.iter().enumerate() {
            if cell.is_empty() {
                continue;
            }
            if !first {
                self.request(".br");
            }
            first = false;
            let name = self.header.get(i + 1).map(String::as_str).unwrap_or("");
            let text = if i + 1 < last && !name.is_empty() {
                format!("{}: {cell}", capitalize(name))
            } else {
                cell.clone()
            };
            self.request(&line_start(&text));
        }
    }
}

/// A line must not start with a control character (`.` or `'`).
fn line_start(s: &str) -> String {
    let s = s.trim_start();
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s.to_owned()
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Text for roff: backslashes, control characters at a line's start, `-` in code, and
/// the few non-ASCII characters the chapter uses, as groff's named glyphs.
fn escape(s: &str, code: bool, block: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at_line_start = block;
    for c in s.chars() {
        if at_line_start && (c == '.' || c == '\'') {
            out.push_str("\\&");
        }
        at_line_start = block && c == '\n';
        match c {
            '\\' => out.push_str("\\e"),
            '-' if code => out.push_str("\\-"),
            // A place to break a long code span (a JSON key list, a URL) that does not fit.
            ',' | '/' if code && !block => {
                out.push(c);
                out.push_str("\\:");
            }
            '—' => out.push_str("\\(em"),
            '–' => out.push_str("\\(en"),
            '§' => out.push_str("\\(sc"),
            '×' => out.push_str("\\(mu"),
            '…' => out.push_str("..."),
            '’' => out.push('\''),
            '“' | '”' => out.push_str("\\(dq"),
            '→' => out.push_str("\\(->"),
            '≤' => out.push_str("\\(<="),
            '≥' => out.push_str("\\(>="),
            _ => out.push(c),
        }
    }
    out
}
