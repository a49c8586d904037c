//! The Porter stemmer as rouge_score applies it: NLTK's `PorterStemmer` in its default
//! `NLTK_EXTENSIONS` mode, i.e. Porter (1980) with Martin Porter's later changes and NLTK's own
//! (a table of irregular forms, four-letter `-ies`/`-ied`, `y → i` only after a consonant, `alli`
//! tried first, `fulli` and `logi`). The Snowball "English" stemmers in Rust crates are Porter2,
//! which stems differently, so this variant is written here. Words are lowercase ASCII, as
//! rouge_score's tokens are; other bytes count as consonants and are never split.

/// Words NLTK maps by table before any rule (`irregular_forms`, inverted).
const IRREGULAR: [(&str, &str); 16] = [
    ("sky", "sky"),
    ("skies", "sky"),
    ("dying", "die"),
    ("lying", "lie"),
    ("tying", "tie"),
    ("news", "news"),
    ("innings", "inning"),
    ("inning", "inning"),
    ("outings", "outing"),
    ("outing", "outing"),
    ("cannings", "canning"),
    ("canning", "canning"),
    ("howe", "howe"),
    ("proceed", "proceed"),
    ("exceed", "exceed"),
    ("succeed", "succeed"),
];

/// One suffix rule: the suffix, its replacement, and the condition on what precedes the suffix.
type Rule<'a> = (&'a str, &'a str, &'a dyn Fn(&str) -> bool);

/// Whether each letter is a consonant: not a, e, i, o, u, and a `y` only when it starts the word
/// or follows a vowel.
fn consonants(w: &str) -> Vec<bool> {
    let mut flags: Vec<bool> = Vec::with_capacity(w.len());
    for (i, c) in w.bytes().enumerate() {
        let consonant = match c {
            b'a' | b'e' | b'i' | b'o' | b'u' => false,
            b'y' => i == 0 || !flags[i - 1],
            _ => true,
        };
        flags.push(consonant);
    }
    flags
}

/// Porter's m: the number of vowel-consonant transitions.
fn measure(stem: &str) -> usize {
    consonants(stem).windows(2).filter(|p| !p[0] && p[1]).count()
}

fn contains_vowel(stem: &str) -> bool {
    consonants(stem).iter().any(|c| !c)
}

/// Porter's *d: the word ends in a doubled consonant.
fn ends_double_consonant(w: &str) -> bool {
    let b = w.as_bytes();
    b.len() >= 2 && b[b.len() - 1] == b[b.len() - 2] && consonants(w)[b.len() - 1]
}

/// Porter's *o (consonant, vowel, consonant other than w, x, y), and NLTK's two-letter
/// vowel-consonant word.
fn ends_cvc(w: &str) -> bool {
    let (b, c) = (w.as_bytes(), consonants(w));
    let n = b.len();
    (n >= 3 && c[n - 3] && !c[n - 2] && c[n - 1] && !matches!(b[n - 1], b'w' | b'x' | b'y'))
        || (n == 2 && !c[0] && c[1])
}

/// The first rule whose suffix the word ends in decides: its replacement when its condition
/// holds, the word unchanged otherwise.
fn apply(word: &str, rules: &[Rule]) -> String {
    for &(suffix, replacement, condition) in rules {
        if let Some(stem) = word.strip_suffix(suffix) {
            return if condition(stem) { format!("{stem}{replacement}") } else { word.to_owned() };
        }
    }
    word.to_owned()
}

fn always(_: &str) -> bool {
    true
}

fn m_above_0(stem: &str) -> bool {
    measure(stem) > 0
}

fn m_above_1(stem: &str) -> bool {
    measure(stem) > 1
}

fn step1a(w: &str) -> String {
    if w.len() == 4
        && let Some(stem) = w.strip_suffix("ies")
    {
        return format!("{stem}ie");
    }
    apply(w, &[("sses", "ss", &always), ("ies", "i", &always), ("ss", "ss", &always), ("s", "", &always)])
}

fn step1b(w: &str) -> String {
    if let Some(stem) = w.strip_suffix("ied") {
        return format!("{stem}{}", if w.len() == 4 { "ie" } else { "i" });
    }
    if let Some(stem) = w.strip_suffix("eed") {
        return if measure(stem) > 0 { format!("{stem}ee") } else { w.to_owned() };
    }
    let Some(stem) = ["ed", "ing"].iter().find_map(|s| w.strip_suffix(s).filter(|stem| contains_vowel(stem))) else {
        return w.to_owned();
    };
    if ["at", "bl", "iz"].iter().any(|s| stem.ends_with(s)) {
        format!("{stem}e")
    } else if ends_double_consonant(stem) {
        if stem.ends_with(['l', 's', 'z']) { stem.to_owned() } else { stem[..stem.len() - 1].to_owned() }
    } else if measure(stem) == 1 && ends_cvc(stem) {
        format!("{stem}e")
    } else {
        stem.to_owned()
    }
}

fn step1c(w: &str) -> String {
    apply(w, &[("y", "i", &|stem: &str| stem.len() > 1 && consonants(stem)[stem.len() - 1])])
}

fn step2(w: &str) -> String {
    if let Some(stem) = w.strip_suffix("alli")
        && measure(stem) > 0
    {
        return step2(&format!("{stem}al"));
    }
    // NLTK keeps the `l` of `logi` with the stem it measures.
    let logi = |_: &str| measure(&w[..w.len() - 3]) > 0;
    apply(
        w,
        &[
            ("ational", "ate", &m_above_0),
            ("tional", "tion", &m_above_0),
            ("enci", "ence", &m_above_0),
            ("anci", "ance", &m_above_0),
            ("izer", "ize", &m_above_0),
            ("bli", "ble", &m_above_0),
            ("alli", "al", &m_above_0),
            ("entli", "ent", &m_above_0),
            ("eli", "e", &m_above_0),
            ("ousli", "ous", &m_above_0),
            ("ization", "ize", &m_above_0),
            ("ation", "ate", &m_above_0),
            ("ator", "ate", &m_above_0),
            ("alism", "al", &m_above_0),
            ("iveness", "ive", &m_above_0),
            ("fulness", "ful", &m_above_0),
            ("ousness", "ous", &m_above_0),
            ("aliti", "al", &m_above_0),
            ("iviti", "ive", &m_above_0),
            ("biliti", "ble", &m_above_0),
            ("fulli", "ful", &m_above_0),
            ("logi", "log", &logi),
        ],
    )
}

fn step3(w: &str) -> String {
    apply(
        w,
        &[
            ("icate", "ic", &m_above_0),
            ("ative", "", &m_above_0),
            ("alize", "al", &m_above_0),
            ("iciti", "ic", &m_above_0),
            ("ical", "ic", &m_above_0),
            ("ful", "", &m_above_0),
            ("ness", "", &m_above_0),
        ],
    )
}

fn step4(w: &str) -> String {
    let ion = |stem: &str| measure(stem) > 1 && stem.ends_with(['s', 't']);
    let rules: Vec<Rule> = [
        "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion", "ou", "ism", "ate",
        "iti", "ous", "ive", "ize",
    ]
    .into_iter()
    .map(|s| -> Rule { (s, "", if s == "ion" { &ion } else { &m_above_1 }) })
    .collect();
    apply(w, &rules)
}

fn step5a(w: &str) -> String {
    match w.strip_suffix('e') {
        Some(stem) if measure(stem) > 1 || (measure(stem) == 1 && !ends_cvc(stem)) => stem.to_owned(),
        _ => w.to_owned(),
    }
}

fn step5b(w: &str) -> String {
    if w.ends_with("ll") && measure(&w[..w.len() - 1]) > 1 { w[..w.len() - 1].to_owned() } else { w.to_owned() }
}

/// NLTK's `PorterStemmer().stem(word)`.
pub fn stem(word: &str) -> String {
    let w = word.to_ascii_lowercase();
    if let Some(&(_, s)) = IRREGULAR.iter().find(|(form, _)| *form == w) {
        return s.to_owned();
    }
    if w.len() <= 2 {
        return w;
    }
    let w = step1b(&step1a(&w));
    step5b(&step5a(&step4(&step3(&step2(&step1c(&w))))))
}
