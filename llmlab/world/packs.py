"""Knowledge packs: small sets of files about things the world's models never read, with questions and exact
answers, for custom assistants built from files (llmlab.assistants).

Three packs, each drawn from the world's seed with names that appear nowhere else in the world:

    handbook    a new company's staff handbook: leave, hours, meetings, people and places of the company
    timetable   a town's bus and ferry timetable: lines, stops, first and last departures, fares
    course      a course's syllabus: instructor, room, weekly topics, the exam, the pass mark

Every fact is one sentence of one file, asked two ways: `seen`, close to the file's words, which a retriever may
be trained on (in the packs of other seeds), and `question`, in other words (what a retriever must bridge,
and what is measured); a question's relevant passage is the one holding its fact's sentence, and its answer
is scored exactly. Files come in the formats a user uploads: Markdown, plain text, JSONL ({"text"} rows)
and PDF (written here with a text layer; `write_pdf`).

    make_packs(world)             {pack: facts}; make_packs(world, seed=s): the packs of another draw
    pack_chunks(facts, max_words) the passages of a pack's files, as an assistant made from them holds them
    write_packs(world, out_dir)   -> out_dir/<pack>/<files> and out_dir/<pack>/questions.jsonl
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from llmlab.assistants.chunks import Chunk, chunk_text
from llmlab.world.core import World
from llmlab.world.entities import CITY_ENDINGS, LAST_ENDINGS, NameMaker

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
SUBJECTS = ["Astronomy", "Botany", "Cartography", "Geology", "Linguistics", "Navigation", "Pottery", "Statistics"]
DISHES = ["lentil soup", "fish pie", "vegetable curry", "mushroom risotto", "bean stew", "noodle salad"]
COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "grey", "white"]


@dataclass(frozen=True)
class Fact:
    file: str
    """the file (of its pack) whose text holds the sentence"""
    sentence: str
    seen: str
    """a question in the file's own words: what a retriever may be trained on (in packs of other seeds)"""
    question: str
    """the same question in other words (what a user asks, and what is measured)"""
    answer: str

    @property
    def standalone(self) -> bool:
        """Whether the sentence read on its own says what the question asks about: every name and number the
        question holds is in it. "Visitor badges are yellow." does not say of which company (its file does), so
        put among other text it no longer answers "What colour is a visitor's badge at Viaa Cooperative?"."""
        named = [w.strip("?,.") for w in self.question.split()[1:]
                 if (w[:1].isupper() and w != "I") or w[:1].isdigit()]
        return all(n in self.sentence for n in named)


def _time(rng: random.Random, lo: int, hi: int) -> str:
    return f"{rng.randint(lo, hi):02d}:{rng.choice([0, 10, 15, 20, 30, 40, 45, 50]):02d}"


def handbook(rng: random.Random, names: NameMaker) -> list[Fact]:
    company = f"{names.place(['', 'a', 'on'])} Cooperative"
    town = names.place(CITY_ENDINGS)
    first = [names.place(["a", "o", "in", "el"]) for _ in range(4)]
    people = [f"{f} {names.place(LAST_ENDINGS)}" for f in first]
    v = dict(company=company, town=town, founded=rng.randint(1990, 2020), staff=rng.randint(40, 900),
             leave=rng.randint(20, 35), start=_time(rng, 7, 9), meeting=rng.choice(WEEKDAYS),
             dish=rng.choice(DISHES), colour=rng.choice(COLOURS), parking=rng.randint(12, 120),
             ceo=people[0], payroll=people[1], safety=people[2], mentor=people[3], floor=rng.randint(2, 9),
             notice=rng.randint(2, 12), bonus=rng.randint(2, 15))
    md, txt, jsonl = "handbook.md", "policies.txt", "staff.jsonl"
    facts = [
        (md, "{company} was founded in {founded} in {town}.", "When was {company} founded?",
         "In which year was {company} set up?", "{founded}"),
        (md, "The head office of {company} is in {town}.", "Where is the head office of {company}?",
         "Which town is {company} based in?", "{town}"),
        (md, "{company} has {staff} members of staff.", "How many staff does {company} have?",
         "How many people work at {company}?", "{staff}"),
        (txt, "Every employee receives {leave} days of paid leave per year.",
         "How many days of paid leave does an employee of {company} get?",
         "How many vacation days do staff at {company} get?", "{leave}"),
        (txt, "The working day starts at {start}.", "When does the working day start at {company}?",
         "What time does work begin each day at {company}?", "{start}"),
        (txt, "The weekly team meeting takes place every {meeting}.", "When is the weekly meeting at {company}?",
         "On which weekday is the team meeting at {company}?", "{meeting}"),
        (txt, "On Fridays the canteen serves {dish}.", "What does the canteen of {company} serve on Fridays?",
         "What is on the canteen menu on Fridays at {company}?", "{dish}"),
        (txt, "Visitor badges are {colour}.", "Which colour are the visitor badges of {company}?",
         "What colour is a visitor's badge at {company}?", "{colour}"),
        (txt, "The car park has {parking} spaces.", "How many spaces has the car park of {company}?",
         "How many cars can park at {company}?", "{parking}"),
        (txt, "Resignations require {notice} weeks of notice.", "How many weeks of notice does a resignation at "
         "{company} require?", "How much notice must someone leaving {company} give, in weeks?", "{notice}"),
        (txt, "The yearly bonus is {bonus} percent of salary.", "How large is the yearly bonus at {company}?",
         "What percentage of pay is the bonus at {company}?", "{bonus}"),
        (jsonl, "{ceo} is the chief executive of {company}.", "Who is the chief executive of {company}?",
         "Who runs {company}?", "{ceo}"),
        (jsonl, "{payroll} handles payroll questions.", "Who handles payroll at {company}?",
         "Whom should I ask about my salary payment at {company}?", "{payroll}"),
        (jsonl, "{safety} is the fire safety officer.", "Who is the fire safety officer of {company}?",
         "Who is responsible for fire safety at {company}?", "{safety}"),
        (jsonl, "New employees are mentored by {mentor}.", "Who mentors new employees at {company}?",
         "Who looks after newcomers at {company}?", "{mentor}"),
        (md, "The library is on floor {floor}.", "On which floor is the library of {company}?",
         "Where in the building of {company} is the library, which level?", "{floor}"),
    ]
    return [Fact(f, s.format(**v), q.format(**v), h.format(**v), a.format(**v)) for f, s, q, h, a in facts]


def timetable(rng: random.Random, names: NameMaker) -> list[Fact]:
    town = names.place(CITY_ENDINGS)
    stops = [names.place(["gate", "cross", "end", "square", "bridge", "hill"]) for _ in range(8)]
    out: list[Fact] = []
    for i, line in enumerate(rng.sample(range(2, 60), 4)):
        a, b = stops[2 * i], stops[2 * i + 1]
        v = dict(town=town, line=line, a=a, b=b, first=_time(rng, 5, 7), last=_time(rng, 21, 23),
                 every=rng.choice([10, 12, 15, 20, 30]), fare=f"{rng.randint(1, 4)}.{rng.choice([0, 2, 5, 8])}0")
        file = "timetable.pdf" if i % 2 == 0 else "timetable.md"
        out += [Fact(file, s.format(**v), q.format(**v), h.format(**v), ans.format(**v)) for s, q, h, ans in [
            ("Bus {line} runs from {a} to {b}.", "Which bus runs from {a} to {b}?",
             "Which bus goes from {a} to {b} in {town}?", "{line}"),
            ("The first bus {line} leaves {a} at {first}.", "When does the first bus {line} leave {a}?",
             "When is the earliest departure of line {line} from {a}?", "{first}"),
            ("The last bus {line} leaves {a} at {last}.", "When does the last bus {line} leave {a}?",
             "How late does the final line {line} bus depart from {a}?", "{last}"),
            ("During the day bus {line} comes every {every} minutes.", "How often does bus {line} come during the day?",
             "How often does line {line} run, in minutes?", "{every}"),
            ("A single ticket on bus {line} costs {fare} crowns.", "How much is a single ticket on bus {line}?",
             "What is the fare for one trip on line {line}?", "{fare}"),
        ]]
    v = dict(town=town, ferry=_time(rng, 6, 10), pier=names.place(["quay", "pier", "wharf"]))
    out += [Fact("ferry.txt", "The ferry to {town} island leaves {pier} at {ferry}.".format(**v),
                 "When does the ferry to {town} island leave?".format(**v),
                 "At what time does the boat to {town} island depart?".format(**v), v["ferry"]),
            Fact("ferry.txt", "Ferries to {town} island depart from {pier}.".format(**v),
                 "Where do ferries to {town} island depart from?".format(**v),
                 "Where do I catch the boat to {town} island?".format(**v), v["pier"])]
    return out


def course(rng: random.Random, names: NameMaker) -> list[Fact]:
    subject = rng.choice(SUBJECTS)
    code = f"{subject[:3].upper()} {rng.randint(100, 399)}"
    teacher = f"{names.place(['a', 'o', 'in', 'el'])} {names.place(LAST_ENDINGS)}"
    topics = [names.place(["ism", "ology", "ics", "ance"]).lower() for _ in range(6)]
    v = dict(code=code, subject=subject, teacher=teacher, room=f"{rng.choice('ABCDE')}{rng.randint(100, 499)}",
             exam=f"{rng.randint(1, 28)} {rng.choice(['May', 'June', 'December'])}", pass_mark=rng.randint(40, 70),
             book=f"{names.place(['', 'a'])} Principles", day=rng.choice(WEEKDAYS), time=_time(rng, 8, 16),
             hours=rng.randint(2, 12))
    facts = [
        ("syllabus.md", "{code} ({subject}) is taught by {teacher}.", "Who teaches {code}?",
         "Who is the lecturer of {code}?", "{teacher}"),
        ("syllabus.md", "Lectures of {code} are held in room {room}.", "In which room are the lectures of {code}?",
         "Where do the {code} lectures take place?", "{room}"),
        ("syllabus.md", "Lectures of {code} are on {day} at {time}.", "On which day are the lectures of {code}?",
         "What weekday are the {code} lectures on?", "{day}"),
        ("syllabus.md", "The final exam of {code} is on {exam}.", "When is the final exam of {code}?",
         "When is the {code} examination?", "{exam}"),
        ("syllabus.md", "To pass {code} a student needs {pass_mark} percent.", "What does a student need to pass {code}?",
         "What score is needed to pass {code}, in percent?", "{pass_mark}"),
        ("reading.txt", "The textbook of {code} is {book}.", "What is the textbook of {code}?",
         "Which book should {code} students read?", "{book}"),
        ("reading.txt", "Students of {code} should study {hours} hours a week outside class.",
         "How many hours a week should students of {code} study outside class?",
         "How many hours of homework per week does {code} expect?", "{hours}"),
    ]
    out = [Fact(f, s.format(**v), q.format(**v), h.format(**v), a.format(**v)) for f, s, q, h, a in facts]
    for week, topic in enumerate(topics, 1):
        out.append(Fact("weeks.jsonl", f"In week {week} of {code} the topic is {topic}.",
                        f"What is the topic in week {week} of {code}?", f"What is covered in week {week} of {code}?",
                        topic))
    return out


PACKS = {"handbook": handbook, "timetable": timetable, "course": course}


def make_packs(world: World, seed: int | None = None) -> dict[str, list[Fact]]:
    """{pack: facts}, deterministic given the world (and `seed`: other draws of the same kinds of pack, with
    other names and values); no name of a pack is a name of the world."""
    rng = random.Random(f"{world.seed}-packs" if seed is None else f"{world.seed}-packs-{seed}")
    names = NameMaker(rng)
    names.used |= {c.name for c in world.countries} | {c.name for c in world.cities} | {c.name for c in world.companies}
    names.used |= {p.name for p in world.people} | set(world.unknown_people)
    return {name: make(rng, names) for name, make in PACKS.items()}


def file_text(facts: list[Fact], file: str) -> str:
    """The plain text of `file`: its facts' sentences, in order."""
    return " ".join(f.sentence for f in facts if f.file == file)


def pack_chunks(facts: list[Fact], max_words: int, prefix: str = "") -> list[Chunk]:
    """The passages of a knowledge pack's files (their text as `file_text` gives it), each citing `prefix` +
    its file."""
    return [c for file in dict.fromkeys(f.file for f in facts)
            for c in chunk_text(file_text(facts, file), prefix + file, max_words)]


def write_pdf(path: Path, text: str, width: int = 90, lines_per_page: int = 60) -> None:
    """A PDF whose text layer is `text`, wrapped at `width` characters (Helvetica 10 pt, A4), several pages if
    need be. Written by hand: PDF's text objects are a few operators (BT, Tf, Td, TL, Tj, T*, ET)."""
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines += [line] if line else []
    pages = [lines[i:i + lines_per_page] for i in range(0, len(lines), lines_per_page)] or [[]]

    def escape(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(len(pages)))}] /Count {len(pages)} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, page in enumerate(pages):
        stream = "BT /F1 10 Tf 12 TL 40 800 Td " + " ".join(f"({escape(s)}) Tj T*" for s in page) + " ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents {5 + 2 * i} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>")
        objects.append(f"<< /Length {len(stream.encode('latin-1'))} >>\nstream\n{stream}\nendstream")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for n, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(bytes(out))


def write_pack(facts: list[Fact], out_dir: Path) -> None:
    """The pack's files (by extension: .md with a heading, .txt, .jsonl rows of one sentence, .pdf) and
    questions.jsonl ({"question", "seen", "answer", "file", "sentence"})."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for file in dict.fromkeys(f.file for f in facts):
        text, path = file_text(facts, file), out_dir / file
        if file.endswith(".pdf"):
            write_pdf(path, text)
        elif file.endswith(".jsonl"):
            path.write_text("".join(json.dumps({"text": f.sentence}) + "\n" for f in facts if f.file == file))
        elif file.endswith(".md"):
            path.write_text(f"# {Path(file).stem.capitalize()}\n\n{text}\n")
        else:
            path.write_text(text + "\n")
    (out_dir / "questions.jsonl").write_text("".join(json.dumps(asdict(f)) + "\n" for f in facts))


def write_packs(world: World, out_dir: str | Path) -> dict[str, int]:
    """Every pack under out_dir/<pack>/; {pack: number of questions}."""
    packs = make_packs(world)
    for name, facts in packs.items():
        write_pack(facts, Path(out_dir) / name)
    return {name: len(facts) for name, facts in packs.items()}
