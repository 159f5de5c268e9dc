"""Built-in English sentences (no dataset download): EVAL_SENTENCES measure how far sentence embeddings move
(attnkit.hf.embedding_similarity) and are held out of conversion; TRAIN_SENTENCES are the default distillation
data of attnkit.hf.convert. The two sets share no sentence. Lengths vary so that batches are padded."""

from __future__ import annotations

EVAL_SENTENCES: tuple[str, ...] = (
    "The cat sat on the warm windowsill and watched the rain.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She plays the violin in a small orchestra every Sunday.",
    "How do I reset my password?",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Photosynthesis converts light energy into chemical energy stored in sugar.",
    "Our flight was delayed by three hours because of a storm over the Atlantic.",
    "He fixed the bug by adding a missing check for empty lists.",
    "A quiet village lies at the foot of the mountains.",
    "The museum opens at nine and closes at five on weekdays.",
    "Children learn languages faster than most adults do.",
    "Please send the signed contract back before Friday.",
    "The telescope captured a faint image of a distant galaxy.",
    "Heavy traffic slowed the morning commute across the bridge.",
    "Regular exercise improves both sleep and mood.",
    "Why is the sky blue?",
)

TRAIN_SENTENCES: tuple[str, ...] = (
    "A dog barked at the mail carrier from behind the fence.",
    "The government announced a new plan to build affordable housing.",
    "He drinks his coffee black, without sugar.",
    "Where is the nearest train station?",
    "The river flooded the fields after a week of heavy rain.",
    "Scientists sequenced the genome of an ancient plant.",
    "The concert was cancelled at the last minute.",
    "She wrote a short program that sorts the files by date.",
    "Autumn leaves covered the path through the park.",
    "The bakery on the corner sells fresh bread every morning.",
    "Electric cars are becoming cheaper to buy and to run.",
    "Can you recommend a good book about history?",
    "The team celebrated their victory late into the night.",
    "Water boils at a lower temperature high in the mountains.",
    "The teacher asked the students to read the first chapter.",
    "A sudden power cut left the whole street in darkness.",
    "They painted the kitchen a bright shade of yellow.",
    "The hospital hired twenty new nurses this year.",
    "My phone battery drains quickly when the screen is bright.",
    "The old bridge was closed for repairs.",
    "Birds migrate south when the weather turns cold.",
    "The company reported record profits in the last quarter.",
    "He forgot his umbrella and got soaked on the way home.",
    "The algorithm finds the shortest path between two cities.",
    "Fresh snow fell overnight on the ski slopes.",
    "What time does the pharmacy close today?",
    "The farmer harvested the wheat before the storm arrived.",
    "The novel tells the story of a family across three generations.",
    "Wind turbines turned slowly on the hills above the town.",
    "She translated the letter from French into English.",
    "The price of fuel rose again this month.",
    "A small boat drifted slowly across the calm lake.",
)
